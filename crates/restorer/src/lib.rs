//! restorer: not yet implemented.
