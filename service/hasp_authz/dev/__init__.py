"""The local stack behind ``make run``: Redis, demo upstream and process control."""
