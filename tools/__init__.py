"""Tools that read or measure runs (compare, ...); common/ never imports them."""
