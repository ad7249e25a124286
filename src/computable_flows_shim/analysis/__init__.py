"""Analysis over checkpoints: diffs, xarray telemetry across runs, export to HDF5/NPZ,
plots.  Imports the checkpoints layer and below; nothing imports it but the CLI and the
package's public surface."""
