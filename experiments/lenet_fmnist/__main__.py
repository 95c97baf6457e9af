from experiments.lenet_fmnist.main import main

main()
