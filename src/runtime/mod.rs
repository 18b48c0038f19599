//! The runtime: plans a pipeline from its file and runs it as async tasks
//! joined by bounded channels.

mod execute;
mod plan;
mod rebatch;

pub use execute::{Counters, RunError, Summary, execute};
pub use plan::{Pipeline, PlanError, plan};
