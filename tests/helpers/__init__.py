"""Test helpers: waiting, free ports, the execution ledger and the process cluster."""
