"""Transaction log -> per-customer RFM table, quintile scores and the classic RFM segment names.

A log is read in blocks with pyarrow (its CSV reader and compute kernels:
no Python per row), each block reduced to one row per customer and purchase
(an order, or a purchase day), and those partial sums merged at the end, so
memory follows the number of purchases, not the size of the file.

Per customer, as of ``as_of`` (the contract's definitions):

- a purchase is an order (distinct ``order_id``) or, without that column, a
  purchase day; it counts when its net amount is not negative; its date is
  the first date among its rows;
- ``recency_days``: days from the last counted purchase to ``as_of``;
- ``frequency``: counted purchases;
- ``monetary``: the sum of every row's amount (returns netted);
- ``tenure_days``: days from the first counted purchase to ``as_of``;
- ``avg_order_value``: ``monetary / frequency``.

Rows dated after ``as_of`` are left out and counted; rows without a customer
id are skipped and counted; customers without a counted purchase are left out
of the table and counted.

The package's modules: ``columns`` (the mapping, constants, the clustering schema, what a read
gives), ``blocks`` (parsing and reducing a block), ``reading`` (a whole log, or a request's
transactions), ``scores`` (quintile scores, segment names and descriptions).
"""

from app.ml.rfm.blocks import customer_frame, parse_block
from app.ml.rfm.columns import (
    MAX_TRANSACTIONS,
    QUANTILES,
    RFM_FEATURES,
    SCORE_COLUMNS,
    SEGMENT_GRID,
    TABLE_COLUMNS,
    LogColumns,
    LogFacts,
    RfmTable,
    rfm_schema,
)
from app.ml.rfm.reading import found_columns, log_header, read_log, transactions_table
from app.ml.rfm.scores import (
    clustering_frame,
    describe_segment,
    fit_cuts,
    one_customer,
    parse_as_of,
    rfm_segments,
    scored_table,
    scores,
    segment_names,
)

__all__ = [
    "MAX_TRANSACTIONS",
    "QUANTILES",
    "RFM_FEATURES",
    "SCORE_COLUMNS",
    "SEGMENT_GRID",
    "TABLE_COLUMNS",
    "LogColumns",
    "LogFacts",
    "RfmTable",
    "clustering_frame",
    "customer_frame",
    "describe_segment",
    "fit_cuts",
    "found_columns",
    "log_header",
    "one_customer",
    "parse_as_of",
    "parse_block",
    "read_log",
    "rfm_schema",
    "rfm_segments",
    "scored_table",
    "scores",
    "segment_names",
    "transactions_table",
]
