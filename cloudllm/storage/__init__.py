"""Artifact stores: one module per object store (gcs.py, s3.py), each uploading a Bundle uncompressed."""
