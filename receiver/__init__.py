"""The webhook receiver: the Flask app that takes the venue's notifications into the inbox."""
