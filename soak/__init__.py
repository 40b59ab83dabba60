"""`make soak`: pathwatch's soak and crash harness (real service, kill -9, an exact model)."""
