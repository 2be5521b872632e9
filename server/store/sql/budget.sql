-- Shared fragments: reading rows only up to what their answer may hold.

-- budget_rows --
-- The rows of {sized} (a statement whose rows say their bytes in a `size` column) read in
-- the order {order} (over the alias k) only while the rows before one hold less than
-- {budget} bytes (the first is always read): the window's running sum reads only `size`, so
-- the rows past the budget are never sent, nor their large values detoasted where `size` is
-- read from the values' headers. followed: a row of {sized} follows this one, so on the last
-- row read it says that the budget left rows out (docs/reliability.md, "Answers read only up
-- to what they may send").
SELECT b.* FROM (
    SELECT k.*, sum(k.size) OVER w - k.size AS before,
           lead(true, 1, false) OVER w AS followed
    FROM ({sized}) AS k
    WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)
) AS b
WHERE b.before < {budget}

-- budget_list_size --
-- The bytes a user's or session's row adds to a list's answer, as budget_rows counts them:
-- its metadata as PostgreSQL prints it (compressed on disk, its stored size would count
-- 60 KB of repeated text as a few hundred bytes) and its ids ({ids}, text columns).
, octet_length({alias}.metadata::text) + octet_length(concat({ids})) AS size
