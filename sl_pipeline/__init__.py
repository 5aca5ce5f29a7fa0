"""sl_pipeline."""
