"""Data sources: where customer data already lives (files under SOURCE_ROOT, SQL databases), read on demand."""
