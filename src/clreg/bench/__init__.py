"""The benchmark harness's scenarios."""
