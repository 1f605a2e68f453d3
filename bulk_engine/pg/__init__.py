"""PostgreSQL building blocks for many workers sharing one backfill (``--db postgresql://…``)."""
