"""`make bench`: pathwatch's performance benchmark (real service, real gRPC, one table)."""
