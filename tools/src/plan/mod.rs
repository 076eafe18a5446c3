//! The capacity planner (`gannet-plan`): a host's profile measured through gannetd
//! (`calibrate`), a workload file (`workload`), and the plan made from both
//! (`model`).

pub mod calibrate;
pub mod model;
pub mod profile;
pub mod workload;

#[cfg(test)]
mod tests;
