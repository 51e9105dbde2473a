//! sluice loadtest.
