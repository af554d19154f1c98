"""vring: a vhost-user back-end whose data plane is numpy views of guest memory and numba kernels."""

__version__ = "0.1.0"
