"""spinemets: detection and localization of spinal metastases on CT with nnU-Net v2.

The package holds all the logic of the notebooks; each module is one pipeline step:
``synth`` (synthetic cohort), ``slicer`` (3D Slicer files), ``dataset`` (manifest and
nnU-Net raw datasets), ``metrics`` (evaluation), and the others named in the book.
Nothing runs at import.
"""

__version__ = "0.1.0"
