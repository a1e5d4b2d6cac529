"""DICOMFuse: mount DICOMweb servers and Cloud Healthcare API datasets as folders."""

__version__ = "0.1.0"
