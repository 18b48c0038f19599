//! The runtime: plans a pipeline from its file and runs it as async tasks
//! joined by bounded channels.

mod chain;
mod execute;
mod plan;
mod rebatch;

pub use chain::{ChainOptions, Intake, Outlet, StageObserver, spawn_chain, spawn_stages};
pub use execute::{
    ABORTING, COMMITTING, Counters, REJECTION_LOG_EVERY, REJECTION_LOG_LIMIT, RUNNING, RunError, Summary, execute,
    is_rejection_logged,
};
pub use plan::{Pipeline, PlanError, PlannedStages, error_chain, plan, plan_stages};
