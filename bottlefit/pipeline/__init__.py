"""The one place that knows the order: load -> split -> build each target -> verify -> manifest."""
