#pragma once
// The ringattn C++ API in one include.

#include "ringattn/block_sparse.h"
#include "ringattn/comm.h"
#include "ringattn/config.h"
#include "ringattn/dilated_attention.h"
#include "ringattn/distributed.h"
#include "ringattn/error.h"
#include "ringattn/multihead.h"
#include "ringattn/ring_attention.h"
#include "ringattn/tensor.h"
#include "ringattn/version.h"
