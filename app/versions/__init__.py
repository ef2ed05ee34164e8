"""Model versions of a segmentation: the registry of versions, the one served, compare and drift."""
