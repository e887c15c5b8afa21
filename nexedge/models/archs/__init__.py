"""The architectures: each module here declares ``ARCHS = (ArchSpec(...), ...)`` for one family.

:func:`nexedge.models.arch_specs` finds every module in this package (no list to keep), so adding an
architecture is an ``ArchSpec`` here (a new family: a new module) whose factory
(``"module:function"``) builds it. These modules import no torch: the command line lists the
architectures and checks ``--arch``/``--pretrained`` without loading it (tests/test_models.py
checks). A module whose import fails for a missing package is skipped and named by
``nexedge.models.arch_spec``, never hiding the others.
"""
