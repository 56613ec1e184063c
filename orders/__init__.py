"""The life of an order between the shop and the venue.

Everything here runs in any role — the worker, the scheduler, the web app, the CLI — and
imports neither Flask nor the settings: callers pass what they need (connections, lease
times, clients). By stage:

- :mod:`orders.inbox` stores the venue's notifications (and otacm's own look-ups) once;
  :mod:`orders.worker` claims them, calls getOrder and mirrors the answer.
- :mod:`orders.mirror` is the only writer of the mirror (``venue_order`` and its items,
  wallets, assets and status changes): whole orders, removals, the change feed's headers,
  erasures; it also says which orders are *stuck*.
- :mod:`orders.submission` reads what the shop sends; :mod:`orders.outbox` records every
  call that changes an order at the venue and claims it; :mod:`orders.sender` sends a
  claimed row (:mod:`orders.attempt` is one attempt, :mod:`orders.calls` what each
  operation calls and how its answer is applied); :mod:`orders.submit` records a sale
  and tries it at once; :mod:`orders.actions` does the same for a person's replace or
  cancel.
- :mod:`orders.story` tells an order's whole story to a person.
"""
