"""Data: the datasets behind ``data.name`` and checked ImageFolder trees."""
