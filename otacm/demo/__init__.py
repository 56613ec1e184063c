"""``otacm demo``: the daemon against the built-in sandbox, for a newcomer to watch.

It starts the sandbox (the simulated venue) on loopback, then ``otacm serve`` — web,
worker and scheduler — as a child process on a demo database, subscribes the receiver to
the venue's ``ota_cm_order_processed`` webhook, and sends a stream of sample orders
through otacm's own API (``POST /api/orders``: the sale is recorded, then createOrder is
called). The venue settles them on its cadence and notifies the receiver; the worker
fetches each order in full. The demo watches the local mirror fill, then prints what it
holds: orders by status, wallets, issued value per currency, the reason of every Error,
and how many venue API calls each order cost.

Then it closes the loop with finance. It plants a few mismatches, each through the
product's own paths (:func:`~otacm.demo.finance.plant_mismatches`): an order placed at
the venue directly, which the receiver mirrors like any other (→ ``orphan``), and the
shop's ledger export written to ``var/demo-ledger.jsonl`` and imported as ``otacm ledger
import`` does, with a sale the venue never got (→ ``missing_at_venue``), an Issued sale
repriced (→ ``amount_mismatch``) and one refunded (→ ``cancelled_in_ledger``). A
reconciliation run over the demo's period follows, and its report's totals and
exceptions are printed (:func:`~otacm.demo.finance.run_lines`), with the address of the
finance pages and a demo user's password, made up for this run and printed once, never
written anywhere. With ``stay`` the demo keeps the daemon up until Ctrl-C so the pages
can be opened; either way it prints how to reopen them later on the same database
(``var/demo-finance.toml``: the database URL, the user's password *hash* and a session
key, owner-readable only; no venue key).

Sample orders come from the sandbox's catalog with a seeded random generator, so a run
can be repeated exactly: most are paid (→ Issued), some are not (→ Draft, awaiting
payment), and the last is an item the venue has sold out (→ Error: its ticket import
fails at processing). A few roles are fixed so that every run shows every case (see
:func:`~otacm.demo.shop.sample_orders`).

The modules, in the order the demo uses them:

- :mod:`otacm.demo.run`: the demo from start to end (:func:`~otacm.demo.run.run_demo`).
- :mod:`otacm.demo.daemon`: the sandbox's connection, ``otacm serve`` as a child process,
  waiting, and staying up until Ctrl-C.
- :mod:`otacm.demo.shop`: the sample orders, their submission, the shop's ledger export.
- :mod:`otacm.demo.mirror`: what the local mirror holds at the end (its summary).
- :mod:`otacm.demo.finance`: the planted mismatches, the reconciliation, the finance
  pages' access.
"""
