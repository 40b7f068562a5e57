"""bc-proxy: the Bulletin Connect legacy SMS API served on top of WebSMS Connexus."""

__version__ = "0.1.0"
