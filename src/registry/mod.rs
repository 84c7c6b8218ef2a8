//! Where images go. ECR is the only registry the platform deploys from.

pub mod ecr;
