"""Image files on disk: the one list of file-name suffixes every stage reads (OpenCV reads them all).

What the daemon decodes when a camera sends a file's bytes is :data:`nexedge.serve.decode.SUFFIXES`
(the same formats). Python 3.8, no torch.
"""

#: Lower-case suffixes of the image files nexedge reads: data sets, labelled imports, calibration,
#: benchmark and realism images.
READ_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
