"""The example Django project: one app, one view that queries, the pool's stats view."""
