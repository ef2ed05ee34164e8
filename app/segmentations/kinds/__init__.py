"""Segmentation kinds as plug-ins: `base.Kind` says what a kind declares, `registry.KINDS` lists them."""
