//! volprep: not yet implemented.
