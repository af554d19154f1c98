"""vhost-user devices built on vring."""
