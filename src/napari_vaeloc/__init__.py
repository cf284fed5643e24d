"""napari-vaeloc: unsupervised anomaly localization in MRI with variational auto-encoders.

The compute core (``io``, ``preprocess``, ``models``, ``scoring``, ``engine``, ``combine``)
never imports napari or Qt, and imports torch only where a network runs.
"""

__version__ = "0.1.0"
