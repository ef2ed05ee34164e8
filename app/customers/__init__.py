"""The customer base: scoring runs, each customer's current segment, audiences and change feeds."""
