"""Fast unit tests: pure logic and a real RocksDB in temp directories, no subprocesses."""
