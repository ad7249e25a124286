"""The checkpoint manager and what it composes: records, lazy views, retention policies,
lineage and multi-process saves.  Imports the store and format layers below it."""
