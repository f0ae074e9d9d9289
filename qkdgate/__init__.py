"""qkdgate: hybrid PQC + QKD encryptor gateway."""

__version__ = "0.1.0"
