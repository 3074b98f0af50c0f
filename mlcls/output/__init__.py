"""The output dataset: schema and part files (`parts`), its reader (`reader`), and what is built on
the reader: `query`, `stats`, `compact` and `report`.
"""
