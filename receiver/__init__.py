"""The webhook receiver: the Flask app that takes the venue's notifications into the inbox.

:func:`create_app` (:mod:`receiver.app`) makes the app; gunicorn loads it as
``'receiver:create_app()'``. The webhook view is :mod:`receiver.webhook`, the inbox
it writes to :mod:`orders.inbox`, its errors :mod:`receiver.errors`, the health checks
:mod:`receiver.health` and the metrics :mod:`receiver.metrics`. Importing the package
opens nothing and reads no setting: the factory does, when called.
"""

from receiver.app import create_app

__all__ = ["create_app"]
