"""Notifications: run summaries and alerts to people (mail, chat through apprise, signed
JSON webhooks), queued in the journal and delivered in the background, never blocking a
patch.

`events` builds the messages, `channels` delivers one (apprise or a signed webhook),
`signing` says how a webhook is signed, `outbox` queues, retries and drops, and
`observer` turns what the engine and runtime report into events. This package imports
nothing at its top, so `patchd.observers` may import `events` without a circle.
"""
