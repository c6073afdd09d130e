"""People, roles and keys (contract §6): who may do what, and the record of what they did.

One module per concept: ``roles`` (the rights table), ``passwords`` (Argon2id), ``operators``,
``apikeys``, ``oplog`` (the append-only, hash-chained operator log), ``lockout`` (failed tries
and the global attempt rate), ``holders`` (activation codes and holders' passwords),
``residents``, ``sessions`` (the web doors' logins) and ``secrets`` (PINs and MAC keys sealed
at rest). Nothing here knows HTTP: the edges map these answers onto their own.
"""
