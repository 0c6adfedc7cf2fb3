//! The nexus controller: reconciles VM spec against status through the node
//! agents, level-triggered.

pub mod agent;
pub mod cache;
pub mod events;
pub mod finalizer;
pub mod gc;
pub mod leader;
pub mod node;
pub mod queue;
pub mod resolve;
pub mod runner;
pub mod scheduler;
pub mod vm;
