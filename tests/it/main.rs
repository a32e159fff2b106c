//! End-to-end tests of mysnap (one test binary). Tests that need root,
//! MariaDB or loop devices are skipped unless `MYSNAP_REAL=1`.

mod backup;
mod crypt;
mod delta;
mod drill;
mod faults;
mod incremental;
mod metrics;
mod options;
mod pitr;
mod prune;
mod restore;
mod smoke;
mod status;
mod store;
mod volprep;
