"""The control socket: how operators steer the running daemon (pause, resume, approve,
trigger, live status, quarantine). `protocol` is the wire format, `server` the socket
and who may use it, `actions` what each verb does to the daemon, `client` the command
line's side, `live` what the daemon is doing right now."""
