"""Data: synthetic Nexperia-like images and the report's train/val/test split.

- :mod:`nexedge.data.synth`: ``render_image``, ``render_pair`` (with the clean twin)
- :mod:`nexedge.data.generate`: ``generate`` (ImageFolder tree, manifest.jsonl, dataset.json)
- :mod:`nexedge.data.split`: ``split_folder``, ``split_counts``, ``assign_splits``
- :mod:`nexedge.data.contact`: ``contact_sheet``
- :mod:`nexedge.data.spec`: class names, class mixes, per-batch styles

Nothing is imported here so that ``nexedge --help`` stays fast; see docs/data.md.
"""
