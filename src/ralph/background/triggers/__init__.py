"""Trigger kinds: one module per kind (cron, idle, after), each answering the same questions
(`TriggerKind`): what fires now and for whom, when to look next, what is upcoming. The
scheduler's loop, recovery and the claim-once machinery are generic; a new kind is a module
here, its model in `ralph.background.models`' `Trigger` union, and its docs."""
