"""The cohort: synthetic cases, downloads, the public collections' layouts, discovery and the import into nnU-Net's raw format."""
