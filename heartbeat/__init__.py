"""The heartbeat: scheduled jobs that see what webhooks miss, recover, and act.

Webhooks are a hint, not a guarantee. The jobs here follow each partner's change feed,
look up orders in flight for too long, find submissions the venue never answered for,
confirm paid drafts, keep the webhook subscription alive, erase customers' names and
e-mails once their visit is long past (:mod:`heartbeat.privacy`), prune the rows past
their retention (:mod:`heartbeat.retention`), and coordinate so
that each job runs at most once at a time across every scheduler process sharing the
database.
Each job is a plain function of its inputs; :mod:`otacm.processes` schedules them.
"""
