"""Developer tools: local services for tests, benchmarks and the local dev setup."""
