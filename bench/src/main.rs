//! Benchmarks of nook against peers (being written).

fn main() {}
