"""Offline model tools: conversion between diffusers folders and original single files, the diffusers
folder layout, and checkpoint merging."""
